"""Files pciguard reads: platform descriptions and scenarios (YAML).

Errors name the file, the line and column, and the key path, e.g.
``workstation.yaml:12:7: at devices[0].children[1].acs: expected 'full', 'none' or ...``.
"""
