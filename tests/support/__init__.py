"""Helpers shared by the test suites: a real registry and an OCI image builder."""
