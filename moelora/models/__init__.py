"""Model families (one file each), the shared decoder they are built from, and the registry."""
