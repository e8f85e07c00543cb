from edgepipe.cli import main

raise SystemExit(main())
