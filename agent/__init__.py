"""The Coffer agent: the in-guest backup extension that dials out to the controller."""
