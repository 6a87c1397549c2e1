"""Sessions to a build VM, independent of the cloud that made it: SSH (``ssh``) with keys derived per build (``keys``)."""
