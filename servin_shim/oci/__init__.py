"""OCI bundles and the OCI runtime (runc or crun): spec generation, process supervision, container I/O."""
