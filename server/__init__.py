"""Corolla's ServerApp, central evaluation, run directory and SuperLink launch helpers."""
