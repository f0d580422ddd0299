"""Stores of last activity and revocations."""
