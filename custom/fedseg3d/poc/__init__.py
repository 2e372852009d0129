"""FLARE POC on one workstation: run a job the way a user does from the admin console, and stop POC."""
