from fashionlens.cli.app import main

main()
