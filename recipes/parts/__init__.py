"""Building blocks the LightningModules share: each file is one concept.

- ``chunked_head``: next-token log-probs, entropies and cross-entropy a chunk of positions at a time.
- ``mae_masking``: MAE's patchify, random masking, masked MSE and 2-D sin-cos position embeddings.
- ``auroc``: the masked multi-label AUROC and its CSV/PNG table.
- ``optim``: optimizer set-up: decay/no-decay groups, ViT layer-decay groups, warm-up + cosine, LR scaling.
- ``hf_model``: building or loading a Hugging Face causal LM and its tokenizer.
- ``vit_checkpoint``: loading a pre-trained encoder into a timm ViT.
- ``loggers``: the default CSV + W&B loggers and the run folder.
- ``wandb_files``: reading the W&B offline run files (a resumed run's step axis; the tests' checks).
"""
