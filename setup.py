"""Package metadata for numerai_nb, read from settings.ini as nbdev 2 projects do."""
from configparser import ConfigParser

import setuptools

config = ConfigParser(delimiters=["="])
config.read("settings.ini", encoding="utf-8")
cfg = config["DEFAULT"]

for key in "version description keywords author author_email".split():
    assert key in cfg, f"settings.ini is missing {key!r}"

licenses = {"apache2": ("Apache Software License 2.0", "OSI Approved :: Apache Software License")}
statuses = ["Planning", "Pre-Alpha", "Alpha", "Beta", "Production/Stable", "Mature", "Inactive"]
lic = licenses[cfg["license"]]
min_python = cfg["min_python"]
requirements = cfg.get("requirements", "").split()
dev_requirements = cfg.get("dev_requirements", "").split()

setuptools.setup(
    name=cfg["repo"],
    license=lic[0],
    classifiers=[
        f"Development Status :: {cfg['status']} - {statuses[int(cfg['status'])]}",
        f"Intended Audience :: {cfg['audience'].title()}",
        f"License :: {lic[1]}",
        f"Natural Language :: {cfg['language'].title()}",
        "Programming Language :: Python :: 3.11",
        "Programming Language :: Python :: 3.12",
    ],
    url=cfg["git_url"],
    packages=setuptools.find_packages(include=["numerai_nb", "numerai_nb.*"]),
    include_package_data=True,
    install_requires=requirements,
    extras_require={"dev": dev_requirements},
    dependency_links=cfg.get("dep_links", "").split(),
    python_requires=f">={min_python}",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    zip_safe=False,
    entry_points={
        "console_scripts": cfg.get("console_scripts", "").split(),
        "nbdev": [f"{cfg['lib_path']}={cfg['lib_path']}._modidx:d"],
    },
    version=cfg["version"],
    description=cfg["description"],
    keywords=cfg["keywords"],
    author=cfg["author"],
    author_email=cfg["author_email"],
)
