from detdistill.cli import main

raise SystemExit(main())
