"""Helpers shared by the tests of every stage: workload programs, launching, golden files."""
