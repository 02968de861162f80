from fashionlens.cli import main

main()
