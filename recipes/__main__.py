from recipes.cli import main

main()
