"""Measure what steering did: behaviour judges and rates with intervals."""
