from mimicfilter_cli.main import main

if __name__ == "__main__":
    main()
