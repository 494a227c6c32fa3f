"""The example configs, one YAML file per stage; installed as the package data of
`fastrlhf.examples`, so that `fastrlhf demo` runs its stages from these same files."""
