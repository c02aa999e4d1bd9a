from bluelm_cli.cli import main

main()
