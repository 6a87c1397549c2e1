"""Microsoft.Compute: virtual machines and their run commands (vm.py), managed disks and snapshots (disks.py),
managed images (images.py), galleries with their image definitions and versions (galleries.py), and the
marketplace's platform images (platform_images.py).

Creates answer 201 / 200 with Azure-AsyncOperation (disks and snapshots 202 / 200); deletes 202 with both LRO
headers.
"""

from ..provider import Provider
from . import disks, galleries, images, platform_images, vm

PROVIDER = Provider(
    types=(*vm.TYPES, *disks.TYPES, *images.TYPES, *galleries.TYPES),
    routes=platform_images.ROUTES,
)
