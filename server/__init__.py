"""The server side: Flower ServerApp, strategy hooks, run directories and the ``fedrec`` CLI."""
