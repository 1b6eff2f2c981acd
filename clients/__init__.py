"""Thin clients over tritonclient, a command line and a load generator."""
