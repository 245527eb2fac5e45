//! A folder we write into, by handle.
//!
//! The output folder is opened once, without following a symbolic link, and everything below it
//! is reached relative to that handle (`openat`, `mkdirat`, `unlinkat`, `renameat`, `fstat`), one
//! component at a time and never through a link: what a path names can change between two calls,
//! what a handle names cannot. Files are opened with `O_NONBLOCK` (a FIFO or device never blocks
//! the open) and their type is checked with `fstat` on the opened descriptor, before any byte is
//! read or written. A file with more than one hard link is refused: writing into it would change
//! the file behind its other name.

use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Component, Path, PathBuf};

use rustix::fs::{AtFlags, FileType, FlockOperation, Mode, OFlags, Stat};
use rustix::io::Errno;

use crate::fetch::SinkError;
use crate::source::ObjectName;

/// Where a file or folder is: its device and inode.
pub type FileId = (u64, u64);

/// A folder held open.
#[derive(Debug)]
pub struct Dir {
    fd: OwnedFd,
    /// Where the folder was when it was opened, for messages.
    path: PathBuf,
}

fn errno_io(what: String) -> impl FnOnce(Errno) -> SinkError {
    move |e| SinkError::Io {
        what,
        source: e.into(),
    }
}

fn refused<T>(msg: String) -> Result<T, SinkError> {
    Err(SinkError::Refused(msg))
}

/// The id of a stat.
pub fn id_of(st: &Stat) -> FileId {
    (st.st_dev, st.st_ino)
}

/// What a file type is called in a message.
fn kind(t: FileType) -> &'static str {
    match t {
        FileType::RegularFile => "a regular file",
        FileType::Directory => "a folder",
        FileType::Symlink => "a symbolic link",
        FileType::Fifo => "a FIFO",
        FileType::Socket => "a socket",
        FileType::CharacterDevice => "a character device",
        FileType::BlockDevice => "a block device",
        FileType::Unknown => "of an unknown type",
    }
}

/// Refuses a descriptor that is not a regular file with exactly one name.
pub fn check_regular(file: &File, shown: &Path) -> Result<Stat, SinkError> {
    let st =
        rustix::fs::fstat(file).map_err(errno_io(format!("inspecting {}", shown.display())))?;
    let t = FileType::from_raw_mode(st.st_mode);
    if t != FileType::RegularFile {
        return refused(format!(
            "{} is {}, not a regular file; dcpfetch writes only regular files",
            shown.display(),
            kind(t)
        ));
    }
    if st.st_nlink != 1 {
        return refused(format!(
            "{} has {} hard links; dcpfetch does not write into a file that has other names",
            shown.display(),
            st.st_nlink
        ));
    }
    Ok(st)
}

/// `path` without trailing slashes or `.` components, so that opening it with `O_NOFOLLOW`
/// refuses a link (`link/` would be resolved through the link).
fn without_trailing(path: &Path) -> PathBuf {
    let p: PathBuf = path.components().collect();
    if p.as_os_str().is_empty() {
        PathBuf::from(Component::CurDir.as_os_str())
    } else {
        p
    }
}

impl Dir {
    /// Opens the output folder, creating it (and its parents) when it does not exist. The folder
    /// itself must not be a symbolic link (its parents may be: they are the user's to choose).
    pub fn open_root(path: &Path) -> Result<Dir, SinkError> {
        let shown = path.to_path_buf();
        let clean = without_trailing(path);
        let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let fd = match rustix::fs::open(&clean, flags, Mode::empty()) {
            Ok(fd) => fd,
            Err(Errno::NOENT) => {
                std::fs::create_dir_all(&clean)
                    .map_err(SinkError::io(format!("creating {}", shown.display())))?;
                rustix::fs::open(&clean, flags, Mode::empty())
                    .map_err(|e| Self::open_error(e, &shown, std::fs::symlink_metadata(&clean)))?
            }
            Err(e) => {
                return Err(Self::open_error(
                    e,
                    &shown,
                    std::fs::symlink_metadata(&clean),
                ));
            }
        };
        Ok(Dir { fd, path: shown })
    }

    /// Explains a failed open of a folder: a link or something else is named, not the error code.
    fn open_error(e: Errno, shown: &Path, what: std::io::Result<std::fs::Metadata>) -> SinkError {
        match what {
            Ok(m) if m.file_type().is_symlink() => SinkError::Refused(format!(
                "{} is a symbolic link; dcpfetch does not write through links",
                shown.display()
            )),
            Ok(m) if !m.is_dir() => {
                SinkError::Refused(format!("{} exists and is not a folder", shown.display()))
            }
            _ => errno_io(format!("opening {}", shown.display()))(e),
        }
    }

    /// Where this folder was when opened, for messages.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// How `leaf` inside this folder is shown in messages.
    pub fn shown(&self, leaf: &str) -> PathBuf {
        self.path.join(leaf)
    }

    /// Explains a failed `openat` of `leaf` from what is there now (for the message only; the
    /// decision was the kernel's).
    fn leaf_error(&self, e: Errno, leaf: &str, want_dir: bool) -> SinkError {
        let shown = self.shown(leaf);
        if let Ok(st) = rustix::fs::statat(&self.fd, leaf, AtFlags::SYMLINK_NOFOLLOW) {
            let t = FileType::from_raw_mode(st.st_mode);
            if t == FileType::Symlink {
                return SinkError::Refused(format!(
                    "{} is a symbolic link; dcpfetch does not write through links",
                    shown.display()
                ));
            }
            if want_dir && t != FileType::Directory {
                return SinkError::Refused(format!(
                    "{} is {}, not a folder",
                    shown.display(),
                    kind(t)
                ));
            }
            if !want_dir && t != FileType::RegularFile {
                return SinkError::Refused(format!(
                    "{} is {}, not a regular file; dcpfetch writes only regular files",
                    shown.display(),
                    kind(t)
                ));
            }
        }
        errno_io(format!("opening {}", shown.display()))(e)
    }

    /// The folder `leaf` inside this one (created when missing and `create`); `None` when it does
    /// not exist and is not to be created.
    pub fn sub(&self, leaf: &str, create: bool) -> Result<Option<Dir>, SinkError> {
        let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let open = || rustix::fs::openat(&self.fd, leaf, flags, Mode::empty());
        let fd = match open() {
            Ok(fd) => fd,
            Err(Errno::NOENT) if create => {
                match rustix::fs::mkdirat(&self.fd, leaf, Mode::from_bits_truncate(0o777)) {
                    Ok(()) | Err(Errno::EXIST) => {}
                    Err(e) => {
                        return Err(
                            errno_io(format!("creating {}", self.shown(leaf).display()))(e),
                        );
                    }
                }
                open().map_err(|e| self.leaf_error(e, leaf, true))?
            }
            Err(Errno::NOENT) => return Ok(None),
            Err(e) => return Err(self.leaf_error(e, leaf, true)),
        };
        Ok(Some(Dir {
            fd,
            path: self.shown(leaf),
        }))
    }

    /// Another handle on this folder.
    pub fn try_clone(&self) -> Result<Dir, SinkError> {
        Ok(Dir {
            fd: self
                .fd
                .try_clone()
                .map_err(SinkError::io(format!("opening {}", self.path.display())))?,
            path: self.path.clone(),
        })
    }

    /// The folder that holds `name` (walked one component at a time, created when `create`) and
    /// the name's last component; `None` when a folder on the way does not exist.
    pub fn parent_of<'n>(
        &self,
        name: &'n ObjectName,
        create: bool,
    ) -> Result<Option<(Dir, &'n str)>, SinkError> {
        let parts: Vec<&str> = name.components().collect();
        let (leaf, folders) = parts.split_last().expect("a name has a component");
        let mut dir = self.try_clone()?;
        for c in folders {
            match dir.sub(c, create)? {
                Some(d) => dir = d,
                None => return Ok(None),
            }
        }
        Ok(Some((dir, leaf)))
    }

    /// Opens the regular file `leaf` for reading and writing (created when `create`); `None` when
    /// it does not exist and is not to be created. A link, a file of several names, or anything
    /// but a regular file is refused before a byte is read or written.
    pub fn open_file(&self, leaf: &str, create: bool) -> Result<Option<(File, Stat)>, SinkError> {
        let mut flags =
            OFlags::RDWR | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::NOCTTY | OFlags::CLOEXEC;
        if create {
            flags |= OFlags::CREATE;
        }
        self.open_with(leaf, flags)
    }

    /// Opens the regular file `leaf` for reading only; `None` when it does not exist.
    pub fn open_read(&self, leaf: &str) -> Result<Option<(File, Stat)>, SinkError> {
        let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::NOCTTY;
        self.open_with(leaf, flags | OFlags::CLOEXEC)
    }

    fn open_with(&self, leaf: &str, flags: OFlags) -> Result<Option<(File, Stat)>, SinkError> {
        let fd = match rustix::fs::openat(&self.fd, leaf, flags, Mode::from_bits_truncate(0o666)) {
            Ok(fd) => fd,
            Err(Errno::NOENT) if !flags.contains(OFlags::CREATE) => return Ok(None),
            Err(e) => return Err(self.leaf_error(e, leaf, false)),
        };
        let file = File::from(fd);
        let st = check_regular(&file, &self.shown(leaf))?;
        Ok(Some((file, st)))
    }

    /// Creates `leaf` anew for writing: whatever was at that name (a stale temporary, a planted
    /// link) is removed without being followed, then the file is created with `O_EXCL`.
    pub fn create_new(&self, leaf: &str) -> Result<File, SinkError> {
        self.remove(leaf)?;
        let flags = OFlags::WRONLY
            | OFlags::CREATE
            | OFlags::EXCL
            | OFlags::NOFOLLOW
            | OFlags::NOCTTY
            | OFlags::CLOEXEC;
        let fd = rustix::fs::openat(&self.fd, leaf, flags, Mode::from_bits_truncate(0o666))
            .map_err(errno_io(format!("creating {}", self.shown(leaf).display())))?;
        Ok(File::from(fd))
    }

    /// Removes the name `leaf` (a link is removed, not followed); whether there was one.
    pub fn remove(&self, leaf: &str) -> Result<bool, SinkError> {
        match rustix::fs::unlinkat(&self.fd, leaf, AtFlags::empty()) {
            Ok(()) => Ok(true),
            Err(Errno::NOENT) => Ok(false),
            Err(Errno::ISDIR) | Err(Errno::PERM) if self.is_dir(leaf) => refused(format!(
                "{} is a folder, where dcpfetch writes a file",
                self.shown(leaf).display()
            )),
            Err(e) => Err(errno_io(format!("removing {}", self.shown(leaf).display()))(e)),
        }
    }

    fn is_dir(&self, leaf: &str) -> bool {
        rustix::fs::statat(&self.fd, leaf, AtFlags::SYMLINK_NOFOLLOW)
            .is_ok_and(|st| FileType::from_raw_mode(st.st_mode) == FileType::Directory)
    }

    /// Renames `from` in this folder to `to` in `dest` (replacing the name `to`, never following it).
    pub fn rename(&self, from: &str, dest: &Dir, to: &str) -> Result<(), SinkError> {
        rustix::fs::renameat(&self.fd, from, &dest.fd, to).map_err(errno_io(format!(
            "renaming {} to {}",
            self.shown(from).display(),
            dest.shown(to).display()
        )))
    }

    /// The device and inode of what the name `leaf` is now, without following it.
    pub fn entry_id(&self, leaf: &str) -> Option<FileId> {
        rustix::fs::statat(&self.fd, leaf, AtFlags::SYMLINK_NOFOLLOW)
            .ok()
            .map(|st| id_of(&st))
    }

    /// The device and inode of this folder.
    pub fn id(&self) -> Result<FileId, SinkError> {
        rustix::fs::fstat(&self.fd)
            .map(|st| id_of(&st))
            .map_err(errno_io(format!("inspecting {}", self.path.display())))
    }

    /// Makes the folder's entries durable.
    pub fn sync(&self) -> Result<(), SinkError> {
        rustix::fs::fsync(&self.fd).map_err(errno_io(format!("syncing {}", self.path.display())))
    }

    /// Whether the folder holds nothing but the entries named in `ignore`.
    pub fn is_empty_but(&self, ignore: &[&str]) -> Result<bool, SinkError> {
        let what = || format!("reading {}", self.path.display());
        let entries = rustix::fs::Dir::read_from(&self.fd).map_err(errno_io(what()))?;
        for entry in entries {
            let entry = entry.map_err(errno_io(what()))?;
            let name = entry.file_name().to_bytes();
            if name != b"." && name != b".." && !ignore.iter().any(|i| i.as_bytes() == name) {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Takes a shared lock on the folder without waiting (the workers of one split fetch hold it
    /// together; a whole fetch's exclusive lock excludes them); `false` when another process holds
    /// it exclusively. The lock lasts as long as this handle (and its clones).
    pub fn try_lock_shared(&self) -> Result<bool, SinkError> {
        match rustix::fs::flock(&self.fd, FlockOperation::NonBlockingLockShared) {
            Ok(()) => Ok(true),
            Err(Errno::WOULDBLOCK) => Ok(false),
            Err(e) => Err(errno_io(format!("locking {}", self.path.display()))(e)),
        }
    }

    /// Waits for an exclusive lock on this folder, through a handle of its own: the lock lasts
    /// until the returned handle is dropped (a critical section among processes).
    pub fn lock(&self) -> Result<Dir, SinkError> {
        let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let what = || format!("locking {}", self.path.display());
        let fd =
            rustix::fs::openat(&self.fd, ".", flags, Mode::empty()).map_err(errno_io(what()))?;
        rustix::fs::flock(&fd, FlockOperation::LockExclusive).map_err(errno_io(what()))?;
        Ok(Dir {
            fd,
            path: self.path.clone(),
        })
    }

    /// The names of the entries in this folder (`.` and `..` left out).
    pub fn names(&self) -> Result<Vec<String>, SinkError> {
        let what = || format!("reading {}", self.path.display());
        let entries = rustix::fs::Dir::read_from(&self.fd).map_err(errno_io(what()))?;
        let mut names = Vec::new();
        for entry in entries {
            let entry = entry.map_err(errno_io(what()))?;
            let name = entry.file_name().to_bytes();
            if name != b"." && name != b".." {
                names.push(String::from_utf8_lossy(name).into_owned());
            }
        }
        Ok(names)
    }

    /// Takes an exclusive lock on the folder without waiting; `false` when another process holds
    /// it. The lock lasts as long as this handle (and its clones).
    pub fn try_lock(&self) -> Result<bool, SinkError> {
        match rustix::fs::flock(&self.fd, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => Ok(true),
            Err(Errno::WOULDBLOCK) => Ok(false),
            Err(e) => Err(errno_io(format!("locking {}", self.path.display()))(e)),
        }
    }

    /// Whether the folder at the path given when it was opened is still this folder.
    pub fn still_at_path(&self) -> Result<bool, SinkError> {
        let now = match std::fs::symlink_metadata(without_trailing(&self.path)) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(SinkError::io(format!("inspecting {}", self.path.display()))(e)),
        };
        use std::os::unix::fs::MetadataExt;
        Ok(now.is_dir() && (now.dev(), now.ino()) == self.id()?)
    }
}

impl AsFd for Dir {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trailing_slashes_and_dots_are_dropped() {
        let table = [
            ("out/", "out"),
            ("out//", "out"),
            ("out/.", "out"),
            ("a/link/", "a/link"),
            (".", "."),
            ("./", "."),
            ("/", "/"),
            ("../x/", "../x"),
        ];
        for (given, want) in table {
            assert_eq!(
                without_trailing(Path::new(given)),
                Path::new(want),
                "{given}"
            );
        }
    }
}
