"""Simulator adapters. Each imports its simulator lazily and says how to
install it when it is missing."""
