"""Container images as cowfs layers: import OCI/docker archives into a
content-addressed layer store, mount an image, and diff/commit its upper dir."""
