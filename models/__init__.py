"""The shipped adapter pool (pool/), installed with the package as `logo_edge.shipped`."""
