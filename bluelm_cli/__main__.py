from bluelm_cli.cli.app import main

main()
