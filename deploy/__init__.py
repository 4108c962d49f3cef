"""How Coffer is installed and run: install scripts, broker config, and the lab of VMs."""
