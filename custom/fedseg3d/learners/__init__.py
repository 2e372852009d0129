"""FLARE adapters: the only place on the site side that imports nvflare."""
