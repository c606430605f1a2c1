#!/usr/bin/env python3
"""A test checkprogram for CRAM-MD5: knows one clear password, checks HMAC-MD5(password, challenge)."""

import hmac
import os
import sys

USERS = {b"sub@example.org": b"s3cret pass"}

data = os.read(3, 4096)
parts = data.split(b"\0")
user, secret, challenge = parts[0], parts[1], parts[2]
password = USERS.get(user)
if password is None:
    sys.exit(1)
if challenge:
    good = hmac.compare_digest(hmac.new(password, challenge, "md5").hexdigest().encode(), secret)
else:
    good = hmac.compare_digest(password, secret)
if not good:
    sys.exit(1)
os.execvp(sys.argv[1], sys.argv[1:])
