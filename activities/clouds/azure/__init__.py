"""The Azure cloud: image builds on real Azure through the Azure SDK for Python (async clients).

Configuration (``AzureCloud.from_environment``):

* ``AZURE_SUBSCRIPTION_ID`` (required): where staging groups, build VMs and images are made.
* Identity: ``DefaultAzureCredential`` (managed identity, ``AZURE_CLIENT_ID``/secret or certificate in the
  environment, or ``az login``). ``deploy/azure-role.json`` is the least-privilege role it needs.
* ``KILN_ARM_ENDPOINT``: another ARM endpoint (a sovereign cloud, or a local emulator); tokens are asked for
  that endpoint's scope.
* ``KILN_EGRESS_IP``: the address this worker reaches build VMs from; the build VM's NSG admits SSH and WinRM
  only from it. Without it, a build whose VM would get a public IP (no ``vmProfile.vnetConfig.subnetId``) is
  refused at resolve source, before anything is made, unless the worker runs with ``--allow-any-source``
  (then the rules admit any source, as Packer does without ``allowed_inbound_ip_addresses``; the VM still
  takes only the build's key or password).
* ``KILN_LOG_ACCOUNT``: a long-lived storage account (name or blob endpoint URL) for build logs and VHD outputs
  that have no ``uri``; see ``activities.clouds.azure.storage`` for what changes without it.
* ``KILN_WORKER_SECRET``: the secret (hex) every worker of the deployment shares; build VM keys and passwords
  are derived from it and the build id. Without it, the machine's own worker secret is used, which is enough
  only while every worker runs on one machine.
"""

from activities.clouds.azure.cloud import AzureCloud

__all__ = ["AzureCloud"]
