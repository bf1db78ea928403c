"""OCI hooks (warmstart.hooks): what belongs to the container's lifecycle, not to runc's CLI."""
