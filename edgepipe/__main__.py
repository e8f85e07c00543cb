from edgepipe.cli.main import main

raise SystemExit(main())
