/* The smallest worker that speaks the launcher's protocol, for timing handoffs.
 *
 * It says READY=1, at once asks to be replaced (SIGUSR1, repeated because the
 * launcher ignores a request from a worker that is still warming), and on
 * SIGHUP says STOPPING=1 and exits 0.  It never accepts a connection, so what
 * a run of it measures is the launcher's own cost per handoff.  C, not
 * Python, so that 10,000 handoffs take seconds rather than minutes.
 */
#include <signal.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

static volatile sig_atomic_t told_to_go;

static void on_hup(int signum) { (void)signum; told_to_go = 1; }

static void notify(const char *message)
{
    const char *path = getenv("NOTIFY_SOCKET");
    struct sockaddr_un address = {.sun_family = AF_UNIX};
    socklen_t length;
    int sock;

    if (!path || !*path)
        return;
    strncpy(address.sun_path, path, sizeof address.sun_path - 1);
    if (path[0] == '@')
        address.sun_path[0] = '\0'; /* abstract namespace */
    length = offsetof(struct sockaddr_un, sun_path) + strlen(path);
    sock = socket(AF_UNIX, SOCK_DGRAM, 0);
    sendto(sock, message, strlen(message), 0, (struct sockaddr *)&address, length);
    close(sock);
}

int main(void)
{
    const char *launcher = getenv("LAUNCHER_PID");
    struct timespec pause = {0, 1000000}; /* 1 ms */

    signal(SIGHUP, on_hup);
    notify("READY=1");
    while (!told_to_go) {
        if (launcher)
            kill(atoi(launcher), SIGUSR1);
        nanosleep(&pause, NULL);
    }
    notify("STOPPING=1");
    return 0;
}
