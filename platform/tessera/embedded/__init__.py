"""The embedded stack for one machine: SeaweedFS serving the S3 API, and a local Ray head.

Both bind to 127.0.0.1 only and keep their state (data, generated credentials, the Ray auth token)
under the git-ignored state folder ``.tessera/`` (or ``$TESSERA_HOME``). ``tessera storage up`` and
``tessera ray up`` (``make storage-up`` / ``make ray-up``) start them; ``source .tessera/env.sh``
gives a shell the variables the real clients (``ray job submit``, ``aws``, boto3) need.
"""
