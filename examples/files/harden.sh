#!/bin/sh
# Golden-image baseline: no root login or passwords over SSH, and a banner that says what this image is.
set -eu
sudo sed -i 's/^#\?PermitRootLogin.*/PermitRootLogin no/; s/^#\?PasswordAuthentication.*/PasswordAuthentication no/' /etc/ssh/sshd_config
echo "golden image built by kiln" | sudo tee /etc/motd >/dev/null
echo "hardened: $(grep -E '^(PermitRootLogin|PasswordAuthentication)' /etc/ssh/sshd_config | tr '\n' ' ')"
