from . import plugin_path

print(plugin_path())
