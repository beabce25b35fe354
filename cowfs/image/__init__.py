"""Container images as cowfs layers.

    cowfs image import DIR[:TAG] | ARCHIVE.tar   OCI layout, `docker save` archive, or
                                                 a rootfs tarball (.tar[.gz|.xz|.zst])
    cowfs image ls [--layers]                    images, containers, layers and users
    cowfs image rm IMAGE|CONTAINER...            layers go once nothing uses them
    cowfs image mount IMAGE MNT [--upper DIR]    the image's layers + a writable upper
    cowfs image pull|push ...                    to and from a registry (registry.py)
    cowfs diff MNT|UPPER [--lower DIR...]        A/C/D per path, as `docker diff`
    cowfs commit MNT|UPPER -o LAYER.tar[.gz|.zst] [--image DIR:TAG]

Modules: oci (reading images, digest checks), unpack (safe tar extraction),
store (the content-addressed layer store, keyed by chain ID), records (its
versioned records), merged (a merged view of a layer stack, by the on-disk
format of cowfs.overlay.format), changes (diff), commit (layer tarballs and OCI
layouts), registry and registry_auth (the distribution API client,
credentials), cli (the subcommands).
"""
