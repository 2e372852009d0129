"""Provisioned deployment: signed startup kits with site policies, and running them on localhost."""
