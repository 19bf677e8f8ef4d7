"""`python -m adapterhub_server`."""

from adapterhub_server.cli import main

raise SystemExit(main())
