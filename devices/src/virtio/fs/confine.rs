//! The file system the guest talks to: fuse-backend-rs's `PassthroughFs` behind a wrapper that
//! adds what the passthrough leaves to its embedder.
//!
//! - Read-only shares: every operation that would change the host tree answers EROFS before it
//!   reaches the passthrough (OPEN for writing or truncation included).
//! - `..`: the passthrough maps `..` on inode 1 to the root itself; the wrapper applies the same
//!   rule to any inode that *is* the shared root on the host (same device and inode number), so
//!   the rule does not depend on the root having only one FUSE inode number.
//! - No device nodes: MKNOD of a character or block device is EPERM. The passthrough would never
//!   open one for the guest, but a node created as root in a host directory is a way out for
//!   whoever on the host can reach that directory.
//! - No setuid or setgid files: CREATE, MKNOD, MKDIR and SETATTR(mode) never set S_ISUID or
//!   S_ISGID (a directory made in a setgid directory loses the inherited bit too), and WRITE,
//!   FALLOCATE, truncation (SETATTR(size), OPEN or CREATE with O_TRUNC) and chown clear them
//!   first, whatever the guest's credentials (kill-priv, as virtiofsd does for callers without
//!   CAP_FSETID; a guest's request to keep them is not trusted). With kiln running as root, the
//!   guest's uid and gid are honoured, so without this a guest could leave a setuid-root binary
//!   in the host directory.
//! - Credentials: an unprivileged kiln cannot switch to the guest's uid, so requests then run as
//!   the host user (files the guest creates belong to the user who runs kiln).
//! - Modes and the umask: a new file, directory or node gets exactly the mode the guest asked
//!   for minus the guest's umask (from the FUSE request), set explicitly after creation, so the
//!   process umask (which the harness owns) neither takes bits away nor is changed. The
//!   passthrough sets the umask to 0 at INIT; INIT therefore runs on a short-lived thread with
//!   its own umask (`unshare(CLONE_FS)`), as does DESTROY (which imports the root again), and the
//!   rest of the process never sees the change.

use std::ffi::CStr;
use std::io;
use std::sync::Mutex;
use std::time::Duration;

use fuse_backend_rs::abi::fuse_abi::{stat64, statvfs64, CreateIn};
use fuse_backend_rs::abi::virtio_fs::RemovemappingOne;
use fuse_backend_rs::api::filesystem::{
    Context, DirEntry, Entry, FileLock, FileSystem, FsOptions, GetxattrReply, IoctlData,
    ListxattrReply, OpenOptions, SetattrValid, ZeroCopyReader, ZeroCopyWriter, ROOT_ID,
};
use fuse_backend_rs::passthrough::PassthroughFs;
use fuse_backend_rs::transport::FsCacheReqHandler;

/// Mode bits a guest may never leave on a host file.
const PRIV_BITS: u32 = libc::S_ISUID | libc::S_ISGID;
/// Mode bits a guest may set: permissions and the sticky bit.
const GUEST_MODE_BITS: u32 = 0o1777;

type Inode = u64;
type Handle = u64;

fn erofs() -> io::Error {
    io::Error::from_raw_os_error(libc::EROFS)
}

/// Runs `f` on a short-lived thread with its own umask, cwd and root (`unshare(CLONE_FS)`).
///
/// The passthrough calls umask(0) whenever it imports the shared root (INIT and DESTROY); in
/// kiln's thread that would apply to every thread of the process (other VMs' devices, the
/// harness writing results). On the helper thread the change dies with the thread.
fn with_own_umask<T: Send>(f: impl FnOnce() -> T + Send) -> io::Result<T> {
    std::thread::scope(|scope| {
        let helper = scope.spawn(|| {
            // SAFETY: unshare(CLONE_FS) only detaches this thread's fs attributes (umask, cwd,
            // root) from the rest of the process; it touches no memory.
            if unsafe { libc::unshare(libc::CLONE_FS) } != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(f())
        });
        match helper.join() {
            Ok(result) => result,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

/// `PassthroughFs` with kiln's confinement and read-only rules.
pub(super) struct ConfinedFs {
    inner: PassthroughFs<()>,
    read_only: bool,
    unprivileged: bool,
    /// (st_dev, st_ino) of the shared root as the passthrough opened it at INIT.
    root_id: Mutex<Option<(u64, u64)>>,
}

impl ConfinedFs {
    pub(super) fn new(inner: PassthroughFs<()>, read_only: bool) -> Self {
        // SAFETY: geteuid has no preconditions and cannot fail.
        let euid = unsafe { libc::geteuid() };
        Self {
            inner,
            read_only,
            unprivileged: euid != 0,
            root_id: Mutex::new(None),
        }
    }

    fn check_writable(&self) -> io::Result<()> {
        if self.read_only {
            Err(erofs())
        } else {
            Ok(())
        }
    }

    /// Gives a node the guest just created exactly `mode & !umask` (permission and sticky bits
    /// only), whatever the process umask or a setgid parent added or took away. `entry` gets
    /// the new attributes. On failure the node stays, with no more than the requested bits
    /// and no setuid/setgid (see the callers), and the error goes to the guest.
    fn settle_mode(
        &self,
        ctx: &Context,
        entry: &mut Entry,
        mode: u32,
        umask: u32,
    ) -> io::Result<()> {
        let want = mode & !umask & GUEST_MODE_BITS;
        if entry.attr.st_mode & 0o7777 == want {
            return Ok(());
        }
        let mut attr = entry.attr;
        attr.st_mode = (attr.st_mode & libc::S_IFMT) | want;
        let result = self
            .inner
            .setattr(ctx, entry.inode, attr, None, SetattrValid::MODE);
        match result {
            Ok((st, _)) => {
                entry.attr = st;
                Ok(())
            }
            Err(e) => {
                self.inner.forget(ctx, entry.inode, 1);
                Err(e)
            }
        }
    }

    /// Kill-priv: clears S_ISUID and S_ISGID on a non-directory before the guest changes its
    /// data or owner, as the kernel does for callers without CAP_FSETID.
    fn kill_priv(&self, ctx: &Context, inode: Inode) -> io::Result<()> {
        let (st, _) = self.inner.getattr(ctx, inode, None)?;
        if st.st_mode & PRIV_BITS == 0 || st.st_mode & libc::S_IFMT == libc::S_IFDIR {
            return Ok(());
        }
        let mut attr = st;
        attr.st_mode &= !PRIV_BITS;
        match self
            .inner
            .setattr(ctx, inode, attr, None, SetattrValid::MODE)
        {
            Ok(_) => Ok(()),
            // An unprivileged kiln may not chmod another user's file, but it has no CAP_FSETID
            // either, so the kernel clears the bits itself when the operation goes ahead.
            Err(_) if self.unprivileged => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Whether `inode` is the shared root directory on the host.
    fn is_root(&self, ctx: &Context, inode: Inode) -> bool {
        if inode == ROOT_ID {
            return true;
        }
        let root = match self.root_id.lock() {
            Ok(guard) => *guard,
            Err(poisoned) => *poisoned.into_inner(),
        };
        match (root, self.inner.getattr(ctx, inode, None)) {
            (Some(root), Ok((st, _))) => (st.st_dev, st.st_ino) == root,
            _ => false,
        }
    }
}

impl FileSystem for ConfinedFs {
    type Inode = Inode;
    type Handle = Handle;

    fn init(&self, capable: FsOptions) -> io::Result<FsOptions> {
        let opts = with_own_umask(|| self.inner.init(capable))??;
        let (st, _) = self.inner.getattr(&Context::new(), ROOT_ID, None)?;
        match self.root_id.lock() {
            Ok(mut guard) => *guard = Some((st.st_dev, st.st_ino)),
            Err(poisoned) => *poisoned.into_inner() = Some((st.st_dev, st.st_ino)),
        }
        Ok(opts)
    }

    fn destroy(&self) {
        // The passthrough's DESTROY imports the root again, umask(0) included.
        if let Err(e) = with_own_umask(|| self.inner.destroy()) {
            tracing::warn!("virtio-fs: cannot reset the file server: {e}");
        }
    }

    fn lookup(&self, ctx: &Context, parent: Inode, name: &CStr) -> io::Result<Entry> {
        if name.to_bytes() == b".." && self.is_root(ctx, parent) {
            // The passthrough answers `..` on ROOT_ID with the root itself.
            return self.inner.lookup(ctx, ROOT_ID, name);
        }
        self.inner.lookup(ctx, parent, name)
    }

    fn forget(&self, ctx: &Context, inode: Inode, count: u64) {
        self.inner.forget(ctx, inode, count)
    }

    fn batch_forget(&self, ctx: &Context, requests: Vec<(Inode, u64)>) {
        self.inner.batch_forget(ctx, requests)
    }

    fn getattr(
        &self,
        ctx: &Context,
        inode: Inode,
        handle: Option<Handle>,
    ) -> io::Result<(stat64, Duration)> {
        self.inner.getattr(ctx, inode, handle)
    }

    fn setattr(
        &self,
        ctx: &Context,
        inode: Inode,
        attr: stat64,
        handle: Option<Handle>,
        valid: SetattrValid,
    ) -> io::Result<(stat64, Duration)> {
        self.check_writable()?;
        let mut attr = attr;
        if valid.contains(SetattrValid::MODE) {
            attr.st_mode &= !PRIV_BITS;
        }
        if valid.intersects(SetattrValid::SIZE | SetattrValid::UID | SetattrValid::GID) {
            self.kill_priv(ctx, inode)?;
        }
        self.inner.setattr(ctx, inode, attr, handle, valid)
    }

    fn readlink(&self, ctx: &Context, inode: Inode) -> io::Result<Vec<u8>> {
        self.inner.readlink(ctx, inode)
    }

    fn symlink(
        &self,
        ctx: &Context,
        linkname: &CStr,
        parent: Inode,
        name: &CStr,
    ) -> io::Result<Entry> {
        self.check_writable()?;
        self.inner.symlink(ctx, linkname, parent, name)
    }

    fn mknod(
        &self,
        ctx: &Context,
        parent: Inode,
        name: &CStr,
        mode: u32,
        rdev: u32,
        umask: u32,
    ) -> io::Result<Entry> {
        self.check_writable()?;
        let kind = mode & libc::S_IFMT;
        if kind == libc::S_IFCHR || kind == libc::S_IFBLK {
            return Err(io::Error::from_raw_os_error(libc::EPERM));
        }
        let mut entry = self
            .inner
            .mknod(ctx, parent, name, mode & !PRIV_BITS, rdev, umask)?;
        self.settle_mode(ctx, &mut entry, mode, umask)?;
        Ok(entry)
    }

    fn mkdir(
        &self,
        ctx: &Context,
        parent: Inode,
        name: &CStr,
        mode: u32,
        umask: u32,
    ) -> io::Result<Entry> {
        self.check_writable()?;
        let mut entry = self
            .inner
            .mkdir(ctx, parent, name, mode & !PRIV_BITS, umask)?;
        self.settle_mode(ctx, &mut entry, mode, umask)?;
        Ok(entry)
    }

    fn unlink(&self, ctx: &Context, parent: Inode, name: &CStr) -> io::Result<()> {
        self.check_writable()?;
        self.inner.unlink(ctx, parent, name)
    }

    fn rmdir(&self, ctx: &Context, parent: Inode, name: &CStr) -> io::Result<()> {
        self.check_writable()?;
        self.inner.rmdir(ctx, parent, name)
    }

    fn rename(
        &self,
        ctx: &Context,
        olddir: Inode,
        oldname: &CStr,
        newdir: Inode,
        newname: &CStr,
        flags: u32,
    ) -> io::Result<()> {
        self.check_writable()?;
        self.inner
            .rename(ctx, olddir, oldname, newdir, newname, flags)
    }

    fn link(
        &self,
        ctx: &Context,
        inode: Inode,
        newparent: Inode,
        newname: &CStr,
    ) -> io::Result<Entry> {
        self.check_writable()?;
        self.inner.link(ctx, inode, newparent, newname)
    }

    fn open(
        &self,
        ctx: &Context,
        inode: Inode,
        flags: u32,
        fuse_flags: u32,
    ) -> io::Result<(Option<Handle>, OpenOptions, Option<u32>)> {
        let flags_i = flags as i32;
        if flags_i & libc::O_ACCMODE != libc::O_RDONLY || flags_i & libc::O_TRUNC != 0 {
            self.check_writable()?;
        }
        if flags_i & libc::O_TRUNC != 0 {
            self.kill_priv(ctx, inode)?;
        }
        self.inner.open(ctx, inode, flags, fuse_flags)
    }

    fn create(
        &self,
        ctx: &Context,
        parent: Inode,
        name: &CStr,
        args: CreateIn,
    ) -> io::Result<(Entry, Option<Handle>, OpenOptions, Option<u32>)> {
        self.check_writable()?;
        let safe = CreateIn {
            mode: args.mode & !PRIV_BITS,
            ..args
        };
        let flags = args.flags as i32;
        // Create exclusively first, to know whether the node is new (its mode is then settled)
        // or existed (its mode is left alone, bar kill-priv on truncation).
        let exclusive = CreateIn {
            flags: (flags | libc::O_EXCL) as u32,
            ..safe
        };
        match self.inner.create(ctx, parent, name, exclusive) {
            Ok((mut entry, handle, opts, passthrough)) => {
                if let Err(e) = self.settle_mode(ctx, &mut entry, args.mode, args.umask) {
                    if let Some(handle) = handle {
                        let _ = self
                            .inner
                            .release(ctx, entry.inode, 0, handle, false, false, None);
                    }
                    return Err(e);
                }
                Ok((entry, handle, opts, passthrough))
            }
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) && flags & libc::O_EXCL == 0 => {
                if flags & libc::O_TRUNC != 0 {
                    let existing = self.inner.lookup(ctx, parent, name)?;
                    let killed = self.kill_priv(ctx, existing.inode);
                    self.inner.forget(ctx, existing.inode, 1);
                    killed?;
                }
                self.inner.create(ctx, parent, name, safe)
            }
            Err(e) => Err(e),
        }
    }

    fn read(
        &self,
        ctx: &Context,
        inode: Inode,
        handle: Handle,
        w: &mut dyn ZeroCopyWriter,
        size: u32,
        offset: u64,
        lock_owner: Option<u64>,
        flags: u32,
    ) -> io::Result<usize> {
        self.inner
            .read(ctx, inode, handle, w, size, offset, lock_owner, flags)
    }

    fn write(
        &self,
        ctx: &Context,
        inode: Inode,
        handle: Handle,
        r: &mut dyn ZeroCopyReader,
        size: u32,
        offset: u64,
        lock_owner: Option<u64>,
        delayed_write: bool,
        flags: u32,
        fuse_flags: u32,
    ) -> io::Result<usize> {
        self.check_writable()?;
        self.kill_priv(ctx, inode)?;
        self.inner.write(
            ctx,
            inode,
            handle,
            r,
            size,
            offset,
            lock_owner,
            delayed_write,
            flags,
            fuse_flags,
        )
    }

    fn flush(
        &self,
        ctx: &Context,
        inode: Inode,
        handle: Handle,
        lock_owner: u64,
    ) -> io::Result<()> {
        self.inner.flush(ctx, inode, handle, lock_owner)
    }

    fn fsync(&self, ctx: &Context, inode: Inode, datasync: bool, handle: Handle) -> io::Result<()> {
        self.inner.fsync(ctx, inode, datasync, handle)
    }

    fn fallocate(
        &self,
        ctx: &Context,
        inode: Inode,
        handle: Handle,
        mode: u32,
        offset: u64,
        length: u64,
    ) -> io::Result<()> {
        self.check_writable()?;
        self.kill_priv(ctx, inode)?;
        self.inner
            .fallocate(ctx, inode, handle, mode, offset, length)
    }

    fn release(
        &self,
        ctx: &Context,
        inode: Inode,
        flags: u32,
        handle: Handle,
        flush: bool,
        flock_release: bool,
        lock_owner: Option<u64>,
    ) -> io::Result<()> {
        self.inner
            .release(ctx, inode, flags, handle, flush, flock_release, lock_owner)
    }

    fn statfs(&self, ctx: &Context, inode: Inode) -> io::Result<statvfs64> {
        let mut st = self.inner.statfs(ctx, inode)?;
        if self.read_only {
            st.f_flag |= libc::ST_RDONLY;
        }
        Ok(st)
    }

    fn setxattr(
        &self,
        ctx: &Context,
        inode: Inode,
        name: &CStr,
        value: &[u8],
        flags: u32,
    ) -> io::Result<()> {
        self.check_writable()?;
        self.inner.setxattr(ctx, inode, name, value, flags)
    }

    fn getxattr(
        &self,
        ctx: &Context,
        inode: Inode,
        name: &CStr,
        size: u32,
    ) -> io::Result<GetxattrReply> {
        self.inner.getxattr(ctx, inode, name, size)
    }

    fn listxattr(&self, ctx: &Context, inode: Inode, size: u32) -> io::Result<ListxattrReply> {
        self.inner.listxattr(ctx, inode, size)
    }

    fn removexattr(&self, ctx: &Context, inode: Inode, name: &CStr) -> io::Result<()> {
        self.check_writable()?;
        self.inner.removexattr(ctx, inode, name)
    }

    fn opendir(
        &self,
        ctx: &Context,
        inode: Inode,
        flags: u32,
    ) -> io::Result<(Option<Handle>, OpenOptions)> {
        self.inner.opendir(ctx, inode, flags)
    }

    fn readdir(
        &self,
        ctx: &Context,
        inode: Inode,
        handle: Handle,
        size: u32,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry) -> io::Result<usize>,
    ) -> io::Result<()> {
        self.inner
            .readdir(ctx, inode, handle, size, offset, add_entry)
    }

    fn readdirplus(
        &self,
        ctx: &Context,
        inode: Inode,
        handle: Handle,
        size: u32,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry, Entry) -> io::Result<usize>,
    ) -> io::Result<()> {
        self.inner
            .readdirplus(ctx, inode, handle, size, offset, add_entry)
    }

    fn fsyncdir(
        &self,
        ctx: &Context,
        inode: Inode,
        datasync: bool,
        handle: Handle,
    ) -> io::Result<()> {
        self.inner.fsyncdir(ctx, inode, datasync, handle)
    }

    fn releasedir(
        &self,
        ctx: &Context,
        inode: Inode,
        flags: u32,
        handle: Handle,
    ) -> io::Result<()> {
        self.inner.releasedir(ctx, inode, flags, handle)
    }

    fn setupmapping(
        &self,
        _ctx: &Context,
        _inode: Inode,
        _handle: Handle,
        _foffset: u64,
        _len: u64,
        _flags: u64,
        _moffset: u64,
        _vu_req: &mut dyn FsCacheReqHandler,
    ) -> io::Result<()> {
        // kiln offers no DAX window (no shared memory region), so there is nothing to map.
        Err(io::Error::from_raw_os_error(libc::ENOSYS))
    }

    fn removemapping(
        &self,
        _ctx: &Context,
        _inode: Inode,
        _requests: Vec<RemovemappingOne>,
        _vu_req: &mut dyn FsCacheReqHandler,
    ) -> io::Result<()> {
        Err(io::Error::from_raw_os_error(libc::ENOSYS))
    }

    fn access(&self, ctx: &Context, inode: Inode, mask: u32) -> io::Result<()> {
        if mask & libc::W_OK as u32 != 0 {
            self.check_writable()?;
        }
        self.inner.access(ctx, inode, mask)
    }

    fn lseek(
        &self,
        ctx: &Context,
        inode: Inode,
        handle: Handle,
        offset: u64,
        whence: u32,
    ) -> io::Result<u64> {
        self.inner.lseek(ctx, inode, handle, offset, whence)
    }

    fn getlk(
        &self,
        ctx: &Context,
        inode: Inode,
        handle: Handle,
        owner: u64,
        lock: FileLock,
        flags: u32,
    ) -> io::Result<FileLock> {
        self.inner.getlk(ctx, inode, handle, owner, lock, flags)
    }

    fn setlk(
        &self,
        ctx: &Context,
        inode: Inode,
        handle: Handle,
        owner: u64,
        lock: FileLock,
        flags: u32,
    ) -> io::Result<()> {
        self.inner.setlk(ctx, inode, handle, owner, lock, flags)
    }

    fn setlkw(
        &self,
        ctx: &Context,
        inode: Inode,
        handle: Handle,
        owner: u64,
        lock: FileLock,
        flags: u32,
    ) -> io::Result<()> {
        self.inner.setlkw(ctx, inode, handle, owner, lock, flags)
    }

    fn ioctl(
        &self,
        _ctx: &Context,
        _inode: Inode,
        _handle: Handle,
        _flags: u32,
        _cmd: u32,
        _data: IoctlData,
        _out_size: u32,
    ) -> io::Result<IoctlData<'_>> {
        // Host ioctls on shared files are not forwarded: their arguments cannot be validated.
        Err(io::Error::from_raw_os_error(libc::ENOTTY))
    }

    fn bmap(&self, ctx: &Context, inode: Inode, block: u64, blocksize: u32) -> io::Result<u64> {
        self.inner.bmap(ctx, inode, block, blocksize)
    }

    fn poll(
        &self,
        ctx: &Context,
        inode: Inode,
        handle: Handle,
        khandle: Handle,
        flags: u32,
        events: u32,
    ) -> io::Result<u32> {
        self.inner.poll(ctx, inode, handle, khandle, flags, events)
    }

    fn notify_reply(&self) -> io::Result<()> {
        self.inner.notify_reply()
    }

    fn id_remap(&self, ctx: &mut Context) -> io::Result<()> {
        if self.unprivileged {
            // uid/gid 0 tells the passthrough not to switch credentials, which only root may do.
            ctx.uid = 0;
            ctx.gid = 0;
        }
        self.inner.id_remap(ctx)
    }
}
