"""The commands of ``python -m recipes`` besides LightningCLI's ``fit``/``validate``/``test`` and ``list``.

- ``demo``: fine-tune the small Llama on the synthetic tasks and summarize what it learned.
- ``export``: a trained checkpoint as a Hugging Face or timm folder.
- ``restore``: Selective Layer Restoration, base-model blocks copied into a post-trained model.
- ``diversity``: how varied a causal LM's sampled completions are, and whether they stay valid.

``checks`` holds what they share: ``CommandError`` (a refusal printed as one line) and the output folder a command
owns (new or empty, or cleared with ``--overwrite``).

Each command module has one entry function that takes the arguments after the command's name; ``recipes/__main__.py``
maps the names to them.
"""
