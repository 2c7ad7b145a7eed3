from eldric_p2p.cli import main

raise SystemExit(main())
