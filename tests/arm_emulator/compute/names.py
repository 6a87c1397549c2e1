"""Microsoft.Compute's resource type names, kept apart because its modules refer to one another's types (a VM
makes its OS disk, a disk is attached to a VM, an image is made from either)."""

VIRTUAL_MACHINES = "Microsoft.Compute/virtualMachines"
RUN_COMMANDS = "Microsoft.Compute/virtualMachines/runCommands"
DISKS = "Microsoft.Compute/disks"
SNAPSHOTS = "Microsoft.Compute/snapshots"
IMAGES = "Microsoft.Compute/images"
GALLERIES = "Microsoft.Compute/galleries"
IMAGE_DEFINITIONS = "Microsoft.Compute/galleries/images"
IMAGE_VERSIONS = "Microsoft.Compute/galleries/images/versions"
