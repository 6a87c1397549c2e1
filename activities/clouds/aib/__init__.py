"""AIB's own rules, written once for both clouds.

What an AIB template means does not depend on where it is built: how the staging group and the build's other
resources are named and tagged, how ARM resource ids and regions are read, how a gallery version is chosen, and
what a distribution target must be before a build starts. Each cloud (``azure/``, ``local/``) imports these and
keeps only its mechanics: the calls that look things up and make them.
"""
