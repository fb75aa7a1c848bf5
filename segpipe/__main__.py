from segpipe.cli import main

raise SystemExit(main())
