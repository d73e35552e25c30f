from bignlp_fast.cli import main

raise SystemExit(main())
