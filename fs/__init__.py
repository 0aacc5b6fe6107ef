"""The FUSE side of SecretFS: secure buffers, volume trees and the filesystem."""
