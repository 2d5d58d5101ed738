"""Print the folder that holds google/api/*.proto, shipped by googleapis-common-protos.

protoc needs it on its include path to compile the google.api.http annotations; using the installed
package's copy keeps the repository free of vendored protos.
"""

from __future__ import annotations

import pathlib

import google.api

if __name__ == "__main__":
    api_dir = pathlib.Path(next(iter(google.api.__path__)))
    print(api_dir.parent.parent)
