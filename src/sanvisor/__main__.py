from sanvisor.cli.main import main

raise SystemExit(main())
