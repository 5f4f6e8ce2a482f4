from kinship_service.server.main import main

raise SystemExit(main())
