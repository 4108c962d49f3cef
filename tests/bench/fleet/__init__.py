"""The fleet simulator: a real controller and thousands of simulated agents (docs/fleet.md)."""
