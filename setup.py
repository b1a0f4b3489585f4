from setuptools import find_packages, setup

setup(
    name="cuse-vfio",
    version="0.1.0",
    description="The Linux VFIO interface in Python, served as real character devices",
    packages=find_packages(include=["cuse_vfio", "cuse_vfio.*"]),
    python_requires=">=3.9",
    install_requires=["cffi>=1.15", "ioctl-opt>=1.3", "mfusepy>=3.0", "tomli>=2.0; python_version<'3.11'"],
    extras_require={"test": ["pytest>=7"]},
    entry_points={"console_scripts": ["cuse-vfio = cuse_vfio.cli:main"]},
)
