from byot.cli import main

raise SystemExit(main())
